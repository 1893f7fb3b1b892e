"""Small shared helpers: user-facing errors, atomic I/O, seeding."""
