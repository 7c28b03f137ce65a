"""``python -m sdn_dist ...`` is ``sdn-dist ...``."""
from sdn_dist.cli import main

raise SystemExit(main())
