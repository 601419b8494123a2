from .cmd.server import main

raise SystemExit(main())
