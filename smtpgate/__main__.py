from smtpgate.cli.main import main

raise SystemExit(main())
