"""The oracle rig: the model against unicorn, QEMU and KVM. SPDX-License-Identifier: GPL-2.0-or-later"""
