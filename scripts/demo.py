"""The main job (`make demo`). Not built yet: see issue 6."""

import sys

sys.stderr.write("make demo: the end-to-end demo is not built yet (issue 6); nothing was run.\n")
sys.exit(1)
