"""Install hints for optional dependencies, in the one form that works: fastpref is installed from its checkout
(it is not on a package index), so a hint names ``pip install -e ".[trl]"`` run in the checkout, never the
package name."""


def install_hint(*extras: str) -> str:
    """``pip install -e ".[a,b]"`` (in the fastpref checkout): the command that adds these extras."""
    return f'pip install -e ".[{",".join(extras)}]" (in the fastpref checkout)'
