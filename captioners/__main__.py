from captioners.cli import main

raise SystemExit(main())
