from qrpark.cli import main

raise SystemExit(main())
