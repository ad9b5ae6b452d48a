"""The panel's one connection between its widgets and its parameter node, alike on every Slicer version. No Qt.

A parameter node wrapper's ``connectGui`` builds one connector per bound
widget, and a combo box's connector clears and refills its combo box
(``QComboBoxToStringableConnector.__init__`` in
Base/Python/slicer/parameterNodeWrapper/guiConnectors.py: line 373 at v5.6.2,
377 at v5.8.1, 440 at v5.10.0 and v5.12.3). Qt signals that as
currentIndexChanged(-1), then (0), and a connector of an earlier connection
that still listens writes what it reads into the node: the last choice, then
the first. Connecting again without disconnecting first therefore rewrites
every choice of the panel.

On Slicer 5.6 and 5.8 ``connectGui`` returns None (wrapper.py lines 241-253 at
v5.6.2 and v5.8.1; it returns the tag from v5.10.0, Slicer commit b5a65a49a0),
so disconnecting with what it returned disconnects nothing. Hence
:class:`GuiConnection`:

- connects the GUI at most once per parameter node: a wrapper of the node it
  is connected to leaves the standing connection (and the wrapper holding it)
  in place;
- where ``connectGui`` returned None, finds the tag where those versions keep
  it: the one key the call added to the wrapper's ``_parameterGUIs``
  (wrapper.py line 132 and lines 204-206 at v5.6.2 and v5.8.1), and
  disconnects with it when the node changes or the panel goes away.

Up to Slicer 5.10 each connection also leaves an observer on the node that
``disconnectGui`` does not remove (wrapper.py line 212 at v5.6.2 to v5.10.0;
removed from v5.12.0, Slicer commit 16069d367e); after the disconnection it
updates no widget, and connecting once per node keeps it to one per node.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def connectGui(wrapper, gui):
    """Connect ``gui`` to the parameter node wrapper; returns the tag to disconnect with, or None if none is known."""
    before = set(getattr(wrapper, "_parameterGUIs", {}))
    tag = wrapper.connectGui(gui)
    if tag is None:  # Slicer 5.6 and 5.8
        added = set(getattr(wrapper, "_parameterGUIs", {})) - before
        if len(added) == 1:
            tag = added.pop()
        else:
            log.warning("URSAM: the parameter node's GUI connection has no tag; it cannot be disconnected")
    return tag


class GuiConnection:
    """The connection between one GUI and the parameter node it shows (at most one at a time)."""

    def __init__(self, gui):
        self._gui = gui
        self._wrapper = None
        self._tag = None

    @property
    def wrapper(self):
        """The connected parameter node wrapper, or None."""
        return self._wrapper

    def bind(self, wrapper):
        """Show ``wrapper``'s node in the GUI (None: show none); returns the wrapper connected now.

        A wrapper of the node already shown returns the wrapper that holds the
        connection, which stays as it is.
        """
        # The wrapper keeps its MRML node as `parameterNode` (wrapper.py line 131, v5.6.2 to v5.12.3); VTK
        # gives one Python object per live C++ object, and the connected wrapper keeps it alive: `is` tells
        # the same node. Each getParameterNode() makes a new wrapper, so wrappers themselves differ.
        if wrapper is not None and self._wrapper is not None and wrapper.parameterNode is self._wrapper.parameterNode:
            return self._wrapper
        self.unbind()
        if wrapper is not None:
            self._tag = connectGui(wrapper, self._gui)
            self._wrapper = wrapper
        return self._wrapper

    def unbind(self):
        """Disconnect the GUI from the node it shows, if any."""
        wrapper, tag = self._wrapper, self._tag
        self._wrapper = self._tag = None
        if wrapper is not None and tag is not None:  # tag 0 is a real tag (the first one, Slicer 5.10 and later)
            wrapper.disconnectGui(tag)
