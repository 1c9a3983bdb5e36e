"""Named configuration presets, one TOML file each."""
