"""The attack catalogue and the settings tables (values checked against deepsec.md §4-5)."""

from __future__ import annotations

import dataclasses

import pytest

from advtrace._src.attacks import catalog
from advtrace._src.attacks import runner
from advtrace._src.attacks import settings as settings_lib

DEEPSEC_18 = ("fgsm", "rfgsm", "bim", "pgd", "umifgsm", "uap", "deepfool", "om", "bpda", "spsa",
              "llc", "rllc", "illc", "tmifgsm", "jsma", "blb", "cw2", "ead")


# ----------------------------------------------------------------------------- catalogue


def test_catalog_has_the_18_deepsec_attacks_and_the_library():
  assert catalog.DEEPSEC_ATTACKS == DEEPSEC_18
  extra = {"fgm_l2", "fgm_l1", "pgd_l2", "mi_fgsm_dong", "deepfool_linf", "nes", "bandits",
           "simba", "simba_dct", "square", "hsj", "sign_opt"}
  assert set(DEEPSEC_18) | extra <= set(catalog.names())
  assert catalog.names() == sorted(catalog.names())


def test_unknown_attack_lists_names():
  with pytest.raises(ValueError, match="Unknown attack 'fgsmm'") as e:
    catalog.get("fgsmm")
  for name in ("fgsm", "cw2", "sign_opt"):
    assert name in str(e.value)


@pytest.mark.parametrize("name,impl,threat,rule", [
    ("fgsm", "gradient:fgsm", "untargeted", "true"),
    ("llc", "gradient:fgsm", "targeted", "least_likely"),
    ("rllc", "gradient:rfgsm", "targeted", "least_likely"),
    ("illc", "gradient:bim", "targeted", "least_likely"),
    ("tmifgsm", "gradient:mi_fgsm", "targeted", "random"),
    ("umifgsm", "gradient:mi_fgsm", "untargeted", "true"),
    ("jsma", "jsma:jsma", "targeted", "random"),
    ("blb", "lbfgs:box_lbfgs", "targeted", "random"),
    ("cw2", "cw:cw_l2", "targeted", "random"),
    ("ead", "ead:ead", "targeted", "random"),
    ("deepfool", "deepfool:deepfool", "untargeted", "true"),
])
def test_deepsec_mapping(name, impl, threat, rule):
  spec = catalog.get(name)
  assert (spec.impl, spec.threat, spec.target_rule) == (impl, threat, rule)
  assert spec.targeted == (threat == "targeted")
  assert spec.reference


def test_fixed_kwargs_define_variants():
  assert dict(catalog.get("umifgsm").fixed_kwargs) == {"normalize_grad": False}  # DEEPSEC
  assert dict(catalog.get("mi_fgsm_dong").fixed_kwargs) == {"normalize_grad": True}
  assert dict(catalog.get("fgm_l2").fixed_kwargs) == {"norm": "l2"}
  assert dict(catalog.get("pgd_l2").fixed_kwargs) == {"norm": "l2"}
  assert dict(catalog.get("simba_dct").fixed_kwargs) == {"basis": "dct"}
  fn = catalog.get("fgm_l2").fn
  assert fn.keywords == {"norm": "l2"}


def test_flags():
  assert catalog.get("uap").needs_train_set and catalog.get("uap").prepare is not None
  assert not catalog.get("fgsm").needs_train_set
  for name in ("spsa", "nes", "bandits", "simba", "simba_dct", "square", "hsj", "sign_opt"):
    assert catalog.get(name).query_based, name
  for name in ("fgsm", "pgd", "cw2", "deepfool", "uap"):
    assert not catalog.get(name).query_based, name


def test_gradient_attacks_resolve():
  from advtrace._src.attacks import gradient

  assert catalog.get("fgsm").fn is gradient.fgsm
  assert catalog.get("illc").fn is gradient.bim
  assert catalog.get("fgsm").available


def test_missing_implementation_is_a_clear_error():
  spec = dataclasses.replace(catalog.get("fgsm"), impl="no_such_module:attack")
  assert not spec.available
  with pytest.raises(catalog.AttackNotAvailableError, match="does not exist yet"):
    spec.fn  # noqa: B018
  spec = dataclasses.replace(catalog.get("fgsm"), impl="gradient:no_such_function")
  with pytest.raises(catalog.AttackNotAvailableError, match="no function 'no_such_function'"):
    spec.fn  # noqa: B018


def test_spec_validation():
  with pytest.raises(ValueError, match="threat"):
    catalog.AttackSpec("x", "gradient:fgsm", "sideways", "true")
  with pytest.raises(ValueError, match="target_rule"):
    catalog.AttackSpec("x", "gradient:fgsm", "targeted", "true")
  with pytest.raises(ValueError, match="prepare"):
    catalog.AttackSpec("x", "gradient:fgsm", "untargeted", "true", needs_train_set=True)


def test_available_reports_every_name():
  status = catalog.available()
  assert sorted(status) == catalog.names()
  assert status["fgsm"] and status["llc"]


# ----------------------------------------------------------------------------- settings


def test_table_names_and_errors():
  assert {"table7_mnist", "table7_cifar10", "deepsec_code_mnist", "deepsec_code_cifar10",
          "table8", "tracing_blackbox", "none"} <= set(settings_lib.table_names())
  with pytest.raises(ValueError, match="Unknown settings table 'table9'.*table7_mnist"):
    settings_lib.get_settings("table9", "fgsm")
  with pytest.raises(ValueError, match="no entry for attack 'spsa'.*table8"):
    settings_lib.get_settings("deepsec_code_mnist", "spsa")  # DEEPSEC has no SPSA
  with pytest.raises(ValueError, match="No table has 'square'"):
    settings_lib.get_settings("table7_mnist", "square")
  assert settings_lib.get_settings("none", "square") == {}


def test_settings_are_copies():
  s = settings_lib.get_settings("table7_mnist", "cw2")
  s["max_iterations"] = 1
  assert settings_lib.get_settings("table7_mnist", "cw2")["max_iterations"] == 10000


def test_every_table_names_catalogue_attacks():
  for table in settings_lib.table_names():
    for attack in settings_lib.get_table(table):
      catalog.get(attack)  # Raises for a name the catalogue does not know.


def test_table7_and_code_cover_the_18():
  for table in ("table7_mnist", "table7_cifar10"):
    assert set(settings_lib.get_table(table)) == set(DEEPSEC_18), table
  for table in ("deepsec_code_mnist", "deepsec_code_cifar10"):
    assert set(settings_lib.get_table(table)) == set(DEEPSEC_18) - {"bpda", "spsa"}, table


def test_table7_values_from_deepsec_md():
  """Spot checks against deepsec.md §4 (Table VII [paper], DEEPSEC code where it is silent)."""
  m, c = settings_lib.get_table("table7_mnist"), settings_lib.get_table("table7_cifar10")
  assert m["fgsm"] == {"eps": 0.3} and c["fgsm"] == {"eps": 0.1}
  # RFGSM: Table VII "eps 0.15, alpha 0.15" = DEEPSEC eps 0.3, alpha_ratio 0.5.
  assert (m["rfgsm"]["eps"], m["rfgsm"]["alpha"]) == (0.3, 0.15)
  assert (c["rfgsm"]["eps"], c["rfgsm"]["alpha"]) == (0.1, 0.05)
  assert (m["bim"]["eps"], m["bim"]["step_size"], m["bim"]["num_steps"]) == (0.3, 0.05, 15)
  assert (c["pgd"]["eps"], c["pgd"]["step_size"], c["pgd"]["num_steps"]) == (0.1, 0.01, 15)
  assert c["pgd"]["random_start"]
  assert (m["umifgsm"]["decay"], m["umifgsm"]["num_steps"]) == (1.0, 15)
  assert m["illc"]["num_steps"] == 10 and c["illc"]["step_size"] == 0.01  # code default 10
  assert m["tmifgsm"]["num_steps"] == 15  # code default 15
  assert m["llc"] == {"eps": 0.3} and c["rllc"] == {"eps": 0.1, "alpha": 0.05}
  assert m["uap"]["fool_rate"] == 0.3 and m["uap"]["eps"] == 0.3 and c["uap"]["eps"] == 0.1
  assert (m["uap"]["deepfool_overshoot"], m["uap"]["deepfool_max_iter"],
          m["uap"]["max_outer_iters"]) == (0.02, 10, 20)
  assert m["deepfool"]["overshoot"] == 0.02 and m["deepfool"]["max_iter"] == 50
  assert (m["om"]["initial_const"], m["om"]["learning_rate"], m["om"]["binary_search_steps"],
          m["om"]["noise_count"], m["om"]["noise_mag"], m["om"]["max_iterations"]) == (
              0.02, 0.2, 4, 20, 0.3, 10000)
  assert (c["om"]["initial_const"], c["om"]["learning_rate"], c["om"]["noise_mag"]) == (
      1.0, 0.02, 0.3)
  assert m["jsma"] == {"theta": 1.0, "gamma": 0.1}
  assert (m["blb"]["binary_search_steps"], m["blb"]["max_iterations"],
          m["blb"]["initial_const"]) == (5, 1000, 0.01)
  for t in (m, c):
    assert (t["cw2"]["binary_search_steps"], t["cw2"]["learning_rate"],
            t["cw2"]["max_iterations"], t["cw2"]["initial_const"], t["cw2"]["kappa"]) == (
                10, 0.02, 10000, 1e-3, 0.0)
    assert (t["ead"]["binary_search_steps"], t["ead"]["beta"], t["ead"]["learning_rate"],
            t["ead"]["decision_rule"]) == (10, 1e-3, 0.02, "en")
    # [ours]: CW's early abort (DEEPSEC has none; deepsec_code_* keep it off, see below).
    assert t["cw2"]["abort_early"] and t["ead"]["abort_early"] and t["om"]["abort_early"]


def test_deepsec_code_mismatches():
  """deepsec.md §4 'Mismatch' column: the code tables take the code values."""
  m, c = settings_lib.get_table("deepsec_code_mnist"), settings_lib.get_table(
      "deepsec_code_cifar10")
  assert m["uap"]["fool_rate"] == 0.35 and c["uap"]["fool_rate"] == 0.9
  assert c["om"]["noise_mag"] == pytest.approx(0.03137, abs=1e-5)
  assert m["om"]["noise_mag"] == 0.3
  assert m["ead"]["binary_search_steps"] == 5 and c["ead"]["binary_search_steps"] == 5
  assert m["deepfool"]["deepsec_extra_step"] and m["uap"]["deepsec_dr"]
  for t in (m, c):  # DEEPSEC's CW2.py, EAD.py and OptMargin.py never abort early
    assert not (t["cw2"]["abort_early"] or t["ead"]["abort_early"] or t["om"]["abort_early"])
  # Where Table VII and the code agree, the tables agree.
  t7 = settings_lib.get_table("table7_mnist")
  for name in ("fgsm", "rfgsm", "bim", "pgd", "illc", "tmifgsm", "jsma", "blb"):
    assert m[name] == t7[name], name
  assert {**t7["cw2"], "abort_early": False} == m["cw2"]


def test_table8_values_from_deepsec_md():
  """deepsec.md §5 (Table VIII) plus attractors.md D12 for SPSA / BPDA."""
  t8 = settings_lib.get_table("table8")
  assert set(t8) == {"fgsm", "pgd", "bpda", "spsa", "cw2", "ead"}
  assert t8["fgsm"] == {"eps": 0.3}
  for name in ("pgd", "bpda"):
    assert (t8[name]["eps"], t8[name]["num_steps"], t8[name]["step_size"]) == (0.3, 100, 0.04)
  assert (t8["spsa"]["eps"], t8["spsa"]["learning_rate"], t8["spsa"]["num_steps"]) == (
      0.3, 0.1, 500)
  assert (t8["spsa"]["delta"], t8["spsa"]["num_samples"], t8["spsa"]["loss"]) == (
      0.01, 128, "margin")
  assert (t8["cw2"]["binary_search_steps"], t8["cw2"]["learning_rate"],
          t8["cw2"]["max_iterations"], t8["cw2"]["initial_const"]) == (20, 0.1, 500, 1e-3)
  assert (t8["ead"]["binary_search_steps"], t8["ead"]["learning_rate"],
          t8["ead"]["max_iterations"], t8["ead"]["initial_const"]) == (20, 0.5, 500, 1e-3)
  # Table VII runs BPDA and SPSA with Table VIII (seed-003 §VI); SPSA stops early there [ours].
  assert settings_lib.get_settings("table7_mnist", "spsa") == {**t8["spsa"], "early_stop": True}
  assert settings_lib.get_settings("table7_cifar10", "bpda") == t8["bpda"]


def test_tracing_values_from_tracing_md():
  t = settings_lib.get_table("tracing_blackbox")
  assert (t["nes"]["eps"], t["nes"]["num_samples"], t["nes"]["sigma"], t["nes"]["norm"]) == (
      1.0, 15, 0.01, "l2")
  assert (t["bandits"]["eps"], t["bandits"]["prior_size"], t["bandits"]["exploration"],
          t["bandits"]["online_lr"], t["bandits"]["image_lr"]) == (1.0, 20, 0.1, 0.1, 0.01)
  assert (t["simba"]["step_size"], t["simba"]["num_iters"]) == (0.1, 3000)
  assert (t["simba_dct"]["freq_dim"], t["simba_dct"]["stride"]) == (4, 1)
  assert (t["hsj"]["num_iterations"], t["hsj"]["max_num_evals"], t["hsj"]["init_num_evals"],
          t["hsj"]["init_size"]) == (50, 10000, 100, 100)
  assert (t["sign_opt"]["alpha"], t["sign_opt"]["beta"], t["sign_opt"]["k"],
          t["sign_opt"]["num_directions"], t["sign_opt"]["num_iterations"],
          t["sign_opt"]["max_queries"], t["sign_opt"]["epsilon"]) == (
              0.2, 0.001, 200, 10, 1500, 10000, 1.0)
  assert t["nes"]["max_queries"] == 1 + 334 * 31 and t["bandits"]["max_queries"] == 15001


def _available_entries():
  for table in settings_lib.table_names():
    for attack in settings_lib.get_table(table):
      yield table, attack


@pytest.mark.parametrize("table,attack", list(_available_entries()))
def test_entries_fit_the_attack_signatures(table, attack):
  """Every table entry's kwargs are accepted by the wired attack (skipped until it lands)."""
  spec = catalog.get(attack)
  if not spec.available:
    pytest.skip(f"{attack}: implementation not available yet ({spec.impl})")
  runner.resolve_attack(attack, table)


def test_resolve_attack_overrides_and_errors():
  spec, kwargs = runner.resolve_attack("pgd", "table7_mnist", '{"eps": 0.2, "num_steps": 3}')
  assert spec.name == "pgd" and kwargs["eps"] == 0.2 and kwargs["num_steps"] == 3
  assert kwargs["step_size"] == 0.05  # the rest of the table entry stays
  _, kwargs = runner.resolve_attack("spsa", "deepsec_code_mnist", fallback_table="table8")
  assert kwargs["num_steps"] == 500
  with pytest.raises(ValueError, match="JSON object"):
    runner.resolve_attack("pgd", "table7_mnist", "eps=0.2")
  with pytest.raises(ValueError, match="set by the runner"):
    runner.resolve_attack("pgd", "table7_mnist", '{"targeted": true}')
  with pytest.raises(ValueError, match="fixed by the catalogue"):
    runner.resolve_attack("fgm_l2", "none", '{"norm": "linf"}')
  if catalog.get("deepfool").available:
    with pytest.raises(ValueError, match="does not accept \\['epsilon'\\].*overshoot"):
      runner.resolve_attack("deepfool", "table7_mnist", '{"epsilon": 0.1}')
