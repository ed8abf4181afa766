"""Data, not code: the model catalog and plan presets (a package only so it ships in the wheel)."""
