from speedlm.cli import main

raise SystemExit(main())
