"""The ``titok-jax`` command line: every argparse parser and console message of the project.
Nothing in the package imports it; :func:`titok_jax.cli.main.main` is the entry point."""
