"""``python -m sdn_dist ...`` is ``sdn-dist ...``."""
from sdn_dist.commands.cli import main

raise SystemExit(main())
