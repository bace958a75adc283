import sys

from ssl_attention.cli import main

sys.exit(main())
