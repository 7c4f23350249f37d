"""``python -m titok_jax.cli ...`` runs ``titok-jax ...``."""
import sys

from titok_jax.cli.main import main

sys.exit(main())
