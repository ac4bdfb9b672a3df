"""NExtLong synthesis: short documents -> long training samples with hard negatives."""

__version__ = "0.1.0"
