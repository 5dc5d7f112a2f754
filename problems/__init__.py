"""Bilevel problem instances with data generators and known solutions.

Every builder returns an :class:`Instance`: the problem, its data, a starting
point and, where they exist, the closed-form (or float64 reference) lower
solution, hypergradient, value function and minimiser.
"""

from problems._base import Instance
from problems.hyper_cleaning import hyper_cleaning, hyper_cleaning_data
from problems.logistic import logistic_regularization
from problems.quadratic import quadratic
from problems.ridge import ridge

__all__ = ["Instance", "hyper_cleaning", "hyper_cleaning_data",
           "logistic_regularization", "quadratic", "ridge"]

from problems.rnn import (rnn_classification_data, rnn_hyper_cleaning,
                          rnn_hyper_representation, rnn_hyperparameter,
                          rnn_tasks_data)

__all__ += ["rnn_classification_data", "rnn_hyper_cleaning",
            "rnn_hyper_representation", "rnn_hyperparameter",
            "rnn_tasks_data"]

from problems.first_order import (box_constrained, sphere_lower_level,
                                  underdetermined_least_squares)

__all__ += ["box_constrained", "sphere_lower_level",
            "underdetermined_least_squares"]

from problems.data_reweighting import digits_sources, text_sources_task

__all__ += ["digits_sources", "text_sources_task"]
