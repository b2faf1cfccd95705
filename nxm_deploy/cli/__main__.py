import sys

from nxm_deploy.cli.main import main

sys.exit(main())
