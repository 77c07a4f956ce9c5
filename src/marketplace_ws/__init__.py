"""
marketplace-ws: the real-time service of a Next.js marketplace.
"""

__version__ = "0.1.0"
