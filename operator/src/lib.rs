//! Colony operator.
