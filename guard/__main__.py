from guard.cli import main
import sys

sys.exit(main())
