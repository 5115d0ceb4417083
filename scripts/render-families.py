#!/usr/bin/env python
"""Print the README's table of model families, generated from the validation rules and the test matrix
(tuneforge/arch/tiny.py MATRIX, trained by tests/test_families.py).

python scripts/render-families.py > /tmp/families.md
"""

from tuneforge.launch.matrix import render_families

if __name__ == "__main__":
    print(render_families(), end="")
