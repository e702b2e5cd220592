"""The one base of every error that a user can fix: the command line prints its message on one line
and exits 2 (no traceback). Each module raises its own subclass (RecipeError, DataError, ...)."""


class QuestError(Exception):
    """A recipe, file or environment that cannot be used as given; the message says what to change."""


class TrainingError(QuestError, RuntimeError):
    """The run cannot go on (non-finite loss, a teacher that does not know the task, ...)."""


class RecipeError(QuestError, ValueError):
    """A recipe that cannot be used, with a message that says what to change."""
