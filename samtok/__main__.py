from samtok.cli import main

raise SystemExit(main())
