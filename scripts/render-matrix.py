#!/usr/bin/env python
"""Print the README's PEFT method x backend matrix, generated from the validation rules.

python scripts/render-matrix.py > /tmp/matrix.md
"""

from tuneforge.launch.matrix import render_matrix

if __name__ == "__main__":
    print(render_matrix(), end="")
