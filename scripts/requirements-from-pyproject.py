"""Print the dependencies of the named extras of pyproject.toml, one per line.

The Dockerfiles install dependencies from this list before copying the source, so a
code change rebuilds only the last layers.
"""

import sys
import tomllib

with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)["project"]
wanted = list(project["dependencies"])
for extra in sys.argv[1:]:
    wanted += project["optional-dependencies"][extra]
print("\n".join(wanted))
