"""Pipeline stages (export, surgery, verify, ...); see base.py for the contract."""
