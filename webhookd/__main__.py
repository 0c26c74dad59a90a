from webhookd.cli import main

raise SystemExit(main())
