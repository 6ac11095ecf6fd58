import sys

from advtrain.console import main

sys.exit(main())
