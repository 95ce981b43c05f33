from ferkit.labels import EMOTIONS, FER2013_CSV_CODES, canonical_label


def test_aliases_and_case_map_to_canonical_names():
    assert canonical_label("Happiness") == "happy"
    assert canonical_label("ANGER") == "angry"
    assert canonical_label("surprised") == "surprise"
    assert canonical_label(" Fearful ") == "fear"
    assert canonical_label("Disgusted") == "disgust"
    assert canonical_label("contempt") == "contempt"


def test_every_csv_code_names_an_emotion_once():
    assert sorted(FER2013_CSV_CODES.values()) == sorted(EMOTIONS)
