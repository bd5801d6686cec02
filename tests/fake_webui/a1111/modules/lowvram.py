"""modules/lowvram.py (A1111): --lowvram/--medvram module swapping."""

from modules import shared

calls = []


def send_everything_to_cpu():
    calls.append("send_everything_to_cpu")


def is_needed(sd_model):
    return shared.cmd_opts.lowvram or shared.cmd_opts.medvram


def apply(sd_model):
    calls.append("apply")
    sd_model.lowvram = is_needed(sd_model)
