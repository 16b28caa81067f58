"""The router: data-parallel workers behind one client endpoint (docs/scaling.md)."""
