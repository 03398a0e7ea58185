"""lmc.calib."""
