"""The commands of the `lit-open` console script besides train and prepare: eval, convert, report, list."""
