from lsdr_repr.cli import main

raise SystemExit(main())
