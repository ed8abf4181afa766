"""Code that runs inside the runner image: `python -m forge.runner prepare|train`."""
