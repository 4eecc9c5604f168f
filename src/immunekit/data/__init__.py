"""Tasks and data: real assets (fetched from the package registry) and synthetic test tasks."""

from __future__ import annotations

from immunekit.data.task import Dataset, Task
from immunekit.registry import Registry

TASKS: Registry = Registry("task")
TASKS.register_lazy("house_prices", "immunekit.data.house_prices:house_prices")
TASKS.register_lazy("gaussian_spectra", "immunekit.data.synthetic:gaussian_spectra")
TASKS.register_lazy("mnist_pair", "immunekit.data.mnist:mnist_pair")
TASKS.register_lazy("csv", "immunekit.data.table:table_task")
TASKS.register_lazy("image_folder", "immunekit.data.image_folder:image_folder_task")
TASKS.register_lazy("qi_harmful_text", "immunekit.data.qi_text:qi_harmful_text")
TASKS.register_lazy("discrim_gender", "immunekit.data.discrim_text:discrim_gender")

__all__ = ["TASKS", "Dataset", "Task"]
