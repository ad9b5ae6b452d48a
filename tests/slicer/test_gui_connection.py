"""The panel's connection to its parameter node (URSAMMRML.guiconnection) on Slicer 5.6/5.8 and 5.10+.

No Qt runs here, so the wrapper's connectGui/disconnectGui protocol is a test
double written after Slicer's own code (Base/Python/slicer/parameterNodeWrapper,
v5.6.2): wrapper.py ``_initMethod`` (lines 131-133), ``_makeGuiToParamCallback``,
``_updateGUIFromParameterNode``, ``_connectParametersToGui`` (194-213),
``_connectGui`` (241-253: returns None up to 5.8, the tag from 5.10.0) and
``_disconnectGui`` (256-260); guiConnectors.py ``QComboBoxToStringableConnector``
(351-395), and of QComboBox what those rely on: clear() and the first
addItem() change the current index and emit currentIndexChanged. The values
live in a real MRML parameter node of a real scene (slicer-core).
"""
import pytest
import slicer
import vtk

from URSAMMRML.guiconnection import GuiConnection, connectGui
from URSAMMRML.parameters import panelParameters

#: the panel's combo boxes: {parameter: (choices, default)}
CHOICES = {p.name: (tuple(p.choices), p.default) for p in panelParameters() if p.choices}


class Combo:
    """A QComboBox as the connectors meet it (Qt 5 QComboBox::clear, addItem, setCurrentIndex)."""

    def __init__(self):
        self.items = []
        self._index = -1
        self.slots = []  # what is connected to currentIndexChanged

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        # an index out of range makes the current index invalid (-1), as QComboBoxPrivate::setCurrentIndex does
        self._setIndex(index if 0 <= index < len(self.items) else -1)

    def clear(self):
        self.items = []
        self._setIndex(-1)

    def addItem(self, text):
        self.items.append(text)
        if self._index == -1:
            self._setIndex(0)  # the first item of an empty combo box becomes current

    def _setIndex(self, index):
        if index != self._index:
            self._index = index
            for slot in list(self.slots):
                slot()

    def choose(self, text):
        """The user picks an item."""
        self.currentIndex = self.items.index(text)

    @property
    def text(self):
        return self.items[self._index] if self._index >= 0 else None


class ComboConnector:
    """guiConnectors.py QComboBoxToStringableConnector (and GuiConnector.onChanged) at v5.6.2."""

    def __init__(self, widget, choices):
        self._widget = widget
        self._choices = choices
        self._callback = None
        self._widget.clear()
        for c in self._choices:
            self._widget.addItem(str(c))

    def onChanged(self, callback):
        self._callback = callback
        if callback is None:
            self._widget.slots.remove(self.changed)
        else:
            self._widget.slots.append(self.changed)

    def changed(self):
        if self._callback:
            self._callback()

    def read(self):
        return self._choices[self._widget.currentIndex]

    def write(self, value):
        self._widget.currentIndex = self._choices.index(value)


class Wrapper56:
    """A parameter node wrapper's GUI protocol as wrapper.py has it at v5.6.2 and v5.8.1: connectGui returns None."""

    RETURNS_TAG = False

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        self._parameterGUIs = {}
        self._nextParameterGUIsTag = 0
        self._updatingGUIFromParameterNode = False
        for name, (_, default) in CHOICES.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, default)

    def getValue(self, name):
        return self.parameterNode.GetParameter(name)

    def setValue(self, name, value):
        self.parameterNode.SetParameter(name, value)

    def _guiToParamCallback(self, name, connector):
        def callback():
            with slicer.util.NodeModify(self.parameterNode):
                if not self._updatingGUIFromParameterNode:
                    self.setValue(name, connector.read())

        return callback

    def _updateGUIFromParameterNode(self):
        if self._updatingGUIFromParameterNode:
            return
        try:
            self._updatingGUIFromParameterNode = True
            with slicer.util.NodeModify(self.parameterNode):
                for mapping in self._parameterGUIs.values():
                    for name, connector in mapping.items():
                        connector.write(self.getValue(name))
        finally:
            self._updatingGUIFromParameterNode = False

    def connectGui(self, gui):
        mapping = {name: ComboConnector(combo, CHOICES[name][0]) for name, combo in gui.items()}
        tag = self._nextParameterGUIsTag
        self._nextParameterGUIsTag += 1
        self._parameterGUIs[tag] = mapping
        for name, connector in mapping.items():
            connector.write(self.getValue(name))
            connector.onChanged(self._guiToParamCallback(name, connector))
        self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent,
                                       lambda caller, event: self._updateGUIFromParameterNode())
        return tag if self.RETURNS_TAG else None

    def disconnectGui(self, tag):
        if tag in self._parameterGUIs:
            for connector in self._parameterGUIs[tag].values():
                connector.onChanged(None)
            del self._parameterGUIs[tag]


class Wrapper510(Wrapper56):
    """The same from v5.10.0 (Slicer commit b5a65a49a0): connectGui returns the tag, the first one 0."""

    RETURNS_TAG = True


CONVENTIONS = pytest.mark.parametrize("Wrapper", [Wrapper56, Wrapper510], ids=["slicer-5.6-5.8", "slicer-5.10+"])

#: a choice for every combo box that is neither its first (what a stale connector writes last) nor its default
CHOSEN = {name: next(c for c in choices if c not in (choices[0], default)) for name, (choices, default) in
          CHOICES.items() if len(choices) > 2}


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def parameterNode(scene, name="URSAM"):
    return scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", name)


def newGui():
    return {name: Combo() for name in CHOICES}


def values(node):
    return {name: node.GetParameter(name) for name in CHOICES}


def listeners(gui):
    return {name: len(combo.slots) for name, combo in gui.items()}


def test_the_panel_has_the_seven_choice_combo_boxes_and_the_double_can_show_the_reset():
    assert set(CHOICES) == {"backend", "device", "prompts", "zoom", "deformable", "thresholdScope", "lowerBound"}
    # the defaults that matter are not the first choices, which a stale connection writes
    assert CHOICES["prompts"][1] != CHOICES["prompts"][0] and CHOICES["deformable"][1] != CHOICES["deformable"][0]
    assert {"prompts", "deformable"} <= set(CHOSEN)


@CONVENTIONS
def test_connecting_again_without_the_tag_rewrites_every_choice_on_5_6_only(scene, Wrapper):
    """The widget as Slicer's module template writes it (connect in setup, disconnect with what connectGui
    returned and connect again in enter): on 5.6/5.8 the first opening sets the first choice everywhere."""
    node = parameterNode(scene)
    gui = newGui()
    first = Wrapper(node)
    tag = first.connectGui(gui)  # setup()
    defaults = {name: default for name, (_, default) in CHOICES.items()}
    assert values(node) == defaults
    first.disconnectGui(tag)  # enter(): setParameterNode(a new wrapper of the same node)
    Wrapper(node).connectGui(gui)
    if Wrapper.RETURNS_TAG:
        assert values(node) == defaults
    else:
        assert values(node) == {name: choices[0] for name, (choices, _) in CHOICES.items()}
        assert (node.GetParameter("prompts"), node.GetParameter("deformable")) == ("box3d", "none")


@CONVENTIONS
def test_the_chosen_values_survive_every_sequence_of_the_panel(scene, Wrapper):
    node = parameterNode(scene)
    gui = newGui()
    connection = GuiConnection(gui)
    shown = connection.bind(Wrapper(node))  # setup()
    assert shown.parameterNode is node
    shown = connection.bind(Wrapper(node))  # enter() after setup: the first opening
    defaults = {name: default for name, (_, default) in CHOICES.items()}
    assert values(node) == defaults
    for name, value in CHOSEN.items():  # the user picks in the panel
        gui[name].choose(value)
    expected = dict(defaults, **CHOSEN)
    assert values(node) == expected
    for _ in range(3):  # exit() (nothing), enter() again
        assert connection.bind(Wrapper(node)) is shown
        assert values(node) == expected
        assert {name: combo.text for name, combo in gui.items()} == expected
    assert listeners(gui) == {name: 1 for name in CHOICES}
    # one connection, so one set of connectors reacts to the user
    gui["prompts"].choose("propagate")
    assert node.GetParameter("prompts") == "propagate"
    gui["prompts"].choose(CHOSEN["prompts"])

    # closing the scene, then the same node shown again
    connection.bind(None)
    assert connection.wrapper is None and listeners(gui) == {name: 0 for name in CHOICES}
    assert shown._parameterGUIs == {}
    connection.bind(Wrapper(node))
    connection.bind(Wrapper(node))
    assert values(node) == expected
    assert {name: combo.text for name, combo in gui.items()} == expected


@CONVENTIONS
def test_another_node_is_connected_alone_and_the_first_keeps_its_values(scene, Wrapper):
    first, second = parameterNode(scene, "first"), parameterNode(scene, "second")
    gui = newGui()
    connection = GuiConnection(gui)
    connection.bind(Wrapper(first))
    for name, value in CHOSEN.items():
        gui[name].choose(value)
    chosen = values(first)
    shown = connection.bind(Wrapper(second))  # e.g. a scene with its own parameter node
    assert shown.parameterNode is second
    assert values(first) == chosen  # the first node's connectors were gone before the combo boxes were refilled
    assert {name: combo.text for name, combo in gui.items()} == values(second)
    assert listeners(gui) == {name: 1 for name in CHOICES}
    gui["deformable"].choose("bspline")
    assert second.GetParameter("deformable") == "bspline"
    assert first.GetParameter("deformable") == chosen["deformable"]


def test_the_tag_connectGui_did_not_return_is_the_one_it_stored(scene):
    node = parameterNode(scene)
    wrapper = Wrapper56(node)
    wrapper.connectGui(newGui())  # someone else's connection on the same wrapper
    gui = newGui()
    tag = connectGui(wrapper, gui)
    assert tag == 1 and set(wrapper._parameterGUIs) == {0, 1}
    assert wrapper._parameterGUIs[tag]["prompts"]._widget is gui["prompts"]
    wrapper.disconnectGui(tag)
    assert listeners(gui) == {name: 0 for name in CHOICES}


def test_a_wrapper_that_keeps_no_tag_is_reported(scene, caplog):
    class NoTags:
        def __init__(self, parameterNode):
            self.parameterNode = parameterNode

        def connectGui(self, gui):
            return None

    with caplog.at_level("WARNING"):
        assert connectGui(NoTags(parameterNode(scene)), newGui()) is None
    assert "cannot be disconnected" in caplog.text
