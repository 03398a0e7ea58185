"""lmc.compiler."""
