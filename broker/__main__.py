"""`python -m broker` is the same as the `mongo-broker` command."""

from broker.cli import main

raise SystemExit(main())
