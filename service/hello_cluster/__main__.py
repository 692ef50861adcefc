from hello_cluster.cli import main

raise SystemExit(main())
