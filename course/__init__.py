"""The course kit: the student-version builder (make.py), the autograder (test_*.py) and grading helpers."""
