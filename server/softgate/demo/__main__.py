from softgate.demo.cli import main

raise SystemExit(main())
