"""x86pt: x86-64 page tables — a bit-exact paging model, an oracle rig, dumps and the Linux CPA model.

SPDX-License-Identifier: GPL-2.0-or-later
"""

from x86pt.errors import X86ptError

__version__ = "0.1.0"
__all__ = ["X86ptError", "__version__"]
