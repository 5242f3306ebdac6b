"""Task modules that ship with tether.

A task module registers plain functions with :func:`tether_server.runtime.task` when it is
imported, and does nothing else at import time (engines import it by reference). The
server configuration lists the modules to load; :mod:`.demo` is always loaded.
"""
