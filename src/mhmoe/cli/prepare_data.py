from mhmoe.data.command import register  # noqa: F401  (mhmoe prepare-data)
