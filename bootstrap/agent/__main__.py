"""``python3 -m bootstrap.agent``: enlist this machine with the seed."""

from .main import main

raise SystemExit(main())
