"""CLI command bodies: glue between parsed arguments and the library."""
