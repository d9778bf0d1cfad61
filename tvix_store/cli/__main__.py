"""`python -m tvix_store.cli …`: the same as the `tvix-store` command."""

import sys

from tvix_store.cli import main

sys.exit(main())
