from relay_server.cli import main

raise SystemExit(main())
