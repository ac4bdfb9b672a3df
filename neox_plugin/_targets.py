"""Names of the GPT-NeoX modules the plugin patches (standard library only, imports nothing).

Shared by :mod:`neox_plugin._hook` (which wraps their loaders) and :mod:`neox_plugin.neox` (which
holds the patches), so neither imports the other at module level.
"""

#: GPT-NeoX modules the plugin patches (kept in sync with ``neox_plugin.neox.PATCHES``).
TARGETS = frozenset(
    {
        "megatron.neox_arguments.neox_args",
        "megatron.neox_arguments.arguments",
        "megatron.data.gpt2_dataset",
        "megatron.data.data_utils",
        "megatron.training",
        "megatron.model.gpt2_model",
        "megatron.utils",
        "megatron.model.transformer",
    }
)
