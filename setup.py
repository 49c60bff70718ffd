"""Which packages the wheel holds: d2build and every package below it, found on disk (so a new family
package needs no line here), plus conf/ and recipes/ shipped as d2build.conf and d2build.recipes.
Everything else about the project is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["d2build", "d2build.*"]), "d2build.conf", "d2build.recipes"],
      package_dir={"d2build.conf": "conf", "d2build.recipes": "recipes"})
